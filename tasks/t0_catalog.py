"""What the P3/T0 subset in `<data_dir>/t0/` contains: datasets, their prompt templates, clusters.

Each file `t0/<dataset>_<template>.jsonl` is one dataset rendered with one P3 prompt template,
so each file becomes one task. The catalog is written out here (rather than listed from the
folder) so that tasks register without the data present, and so that a missing or extra file
in a user's copy is noticed instead of silently changing the mixture.

Clusters are the eight T0 training clusters of Sanh et al. (2022), Table/Figure 2.
"""

from __future__ import annotations

CLUSTERS: dict[str, tuple[str, ...]] = {
    "multiple_choice_qa": ("commonsense_qa", "cosmos_qa", "dream", "qasc", "quarel", "quartz", "sciq",
                           "social_i_qa", "wiki_hop_original", "wiqa"),
    "extractive_qa": ("adversarial_qa_dbert", "adversarial_qa_dbidaf", "adversarial_qa_droberta",
                      "duorc_ParaphraseRC", "duorc_SelfRC", "quoref", "ropes"),
    "closed_book_qa": ("kilt_tasks_hotpotqa", "wiki_qa"),
    "sentiment": ("amazon_polarity", "app_reviews", "imdb", "rotten_tomatoes", "yelp_review_full"),
    "topic_classification": ("ag_news", "dbpedia_14", "trec"),
    "structure_to_text": ("common_gen", "wiki_bio"),
    "summarization": ("cnn_dailymail_3_0_0", "gigaword", "multi_news", "samsum", "xsum"),
    "paraphrase": ("glue_mrpc", "glue_qqp", "paws_labeled_final"),
}

_SENTIMENT_TEMPLATES = (
    "Movie_Expressed_Sentiment", "Movie_Expressed_Sentiment_2", "Reviewer_Enjoyment", "Reviewer_Enjoyment_Yes_No",
    "Reviewer_Expressed_Sentiment", "Reviewer_Opinion_bad_good_choices", "Reviewer_Sentiment_Feeling",
    "Sentiment_with_choices_", "Text_Expressed_Sentiment", "Writer_Expressed_Sentiment",
)
_ADVERSARIAL_QA = ("answer_the_following_q", "based_on", "generate_question", "question_context_answer",
                   "tell_what_it_is")
_DUORC = ("answer_question", "build_story_around_qa", "decide_worth_it", "extract_answer", "generate_question",
          "generate_question_by_answer", "movie_director", "question_answering", "title_generation")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "adversarial_qa_dbert": _ADVERSARIAL_QA,
    "adversarial_qa_dbidaf": _ADVERSARIAL_QA,
    "adversarial_qa_droberta": _ADVERSARIAL_QA,
    "ag_news": ("classify", "classify_question_first", "classify_with_choices",
                "classify_with_choices_question_first", "recommend", "which_section", "which_section_choices"),
    "amazon_polarity": ("Is_this_product_review_positive", "Is_this_review", "Is_this_review_negative",
                        "User_recommend_this_product", "convey_negative_or_positive_sentiment", "flattering_or_not",
                        "negative_or_positive_tone", "user_satisfied", "would_you_buy"),
    "app_reviews": ("categorize_rating_using_review", "convert_to_rating", "convert_to_star_rating",
                    "generate_review"),
    "cnn_dailymail_3_0_0": ("2_or_3_sentences", "generate_story", "news_card_view", "news_stock", "news_summary",
                            "spice_up_story", "sum_in_brief", "tldr_summary", "write_an_outline"),
    "common_gen": ("Example_prompt", "Given_concepts_type_1", "Given_concepts_type_2", "Put_together",
                   "choice_in_concept_centric_sentence_generation", "random_task_template_prompt",
                   "sentence_to_concepts", "topic_to_sentence", "topics_from_the_sentence"),
    "commonsense_qa": ("answer_given_question_without_options", "answer_to_question", "most_suitable_answer",
                       "question_answering", "question_to_answer_index"),
    "cosmos_qa": ("context_answer_to_question", "context_description_question_answer_id",
                  "context_description_question_answer_text", "context_description_question_text",
                  "context_question_description_answer_id", "context_question_description_answer_text",
                  "context_question_description_text", "description_context_question_answer_id",
                  "description_context_question_answer_text", "description_context_question_text", "no_prompt_id",
                  "no_prompt_text", "only_question_answer"),
    "dbpedia_14": ("given_a_choice_of_categories_", "given_a_list_of_category_what_does_the_title_belong_to",
                   "given_list_what_category_does_the_paragraph_belong_to",
                   "pick_one_category_for_the_following_text"),
    "dream": ("answer_to_dialogue", "baseline", "generate_first_utterance", "generate_last_utterance",
              "read_the_following_conversation_and_answer_the_question"),
    "duorc_ParaphraseRC": _DUORC,
    "duorc_SelfRC": _DUORC,
    "gigaword": ("TLDR", "first_sentence_title", "generate_summary_for_this", "in_a_nutshell", "make_a_title",
                 "reverse_writing", "write_a_title_for_this_sentence", "write_an_article", "write_its_sentence"),
    "glue_mrpc": ("equivalent", "generate_paraphrase", "generate_sentence", "paraphrase", "replace", "same_thing",
                  "want_to_know"),
    "glue_qqp": ("answer", "duplicate", "duplicate_or_not", "meaning", "quora", "same_thing"),
    "imdb": _SENTIMENT_TEMPLATES[:2] + ("Negation_template_for_positive_and_negative",) + _SENTIMENT_TEMPLATES[2:],
    "kilt_tasks_hotpotqa": ("combining_facts", "complex_question", "final_exam", "formulate", "straighforward_qa"),
    "multi_news": ("distill", "expand_reverse_task_", "summarize", "summary_scenario", "synthesize",
                   "what_are_the_key_points"),
    "paws_labeled_final": ("Concatenation", "Concatenation_no_label", "Meaning", "Meaning_no_label",
                           "PAWS_ANLI_GPT3", "PAWS_ANLI_GPT3_no_label", "Rewrite", "Rewrite_no_label",
                           "context_question", "context_question_no_label", "paraphrase_task",
                           "task_description_no_label"),
    "qasc": ("is_correct_1", "is_correct_2", "qa_with_combined_facts_1", "qa_with_separated_facts_1",
             "qa_with_separated_facts_2", "qa_with_separated_facts_3", "qa_with_separated_facts_4",
             "qa_with_separated_facts_5"),
    "quarel": ("choose_between", "do_not_use", "heres_a_story", "logic_test", "testing_students"),
    "quartz": ("answer_question_based_on", "answer_question_below", "given_the_fact_answer_the_q",
               "having_read_above_passage", "paragraph_question_plain_concat", "read_passage_below_choose",
               "use_info_from_paragraph_question", "use_info_from_question_paragraph"),
    "quoref": ("Answer_Friend_Question", "Answer_Question_Given_Context", "Answer_Test", "Context_Contains_Answer",
               "Find_Answer", "Found_Context_Online", "Given_Context_Answer_Question", "Guess_Answer",
               "Guess_Title_For_Context", "Read_And_Extract_", "What_Is_The_Answer"),
    "ropes": ("background_new_situation_answer", "background_situation_middle", "given_background_situation",
              "new_situation_background_answer", "plain_background_situation", "plain_bottom_hint",
              "plain_no_background", "prompt_beginning", "prompt_bottom_hint_beginning", "prompt_bottom_no_hint",
              "prompt_mix", "read_background_situation"),
    "rotten_tomatoes": _SENTIMENT_TEMPLATES,
    "samsum": ("Generate_a_summary_for_this_dialogue", "Given_the_above_dialogue_write_a_summary",
               "Sum_up_the_following_dialogue", "Summarize_", "Summarize_this_dialogue_", "To_sum_up_this_dialog",
               "Write_a_dialogue_that_match_this_summary"),
    "sciq": ("Direct_Question", "Direct_Question_Closed_Book_", "Multiple_Choice", "Multiple_Choice_Closed_Book_",
             "Multiple_Choice_Question_First"),
    "social_i_qa": ("Check_if_a_random_answer_is_valid_or_not", "Generate_answer",
                    "Generate_the_question_from_the_answer", "I_was_wondering", "Show_choices_and_generate_answer",
                    "Show_choices_and_generate_index"),
    "trec": ("fine_grained_ABBR", "fine_grained_ABBR_context_first", "fine_grained_DESC",
             "fine_grained_DESC_context_first", "fine_grained_ENTY", "fine_grained_HUM",
             "fine_grained_HUM_context_first", "fine_grained_LOC", "fine_grained_LOC_context_first",
             "fine_grained_NUM", "fine_grained_NUM_context_first", "fine_grained_open",
             "fine_grained_open_context_first", "pick_the_best_descriptor", "trec1", "trec2",
             "what_category_best_describe", "which_category_best_describes"),
    "wiki_bio": ("comprehension", "guess_person", "key_content", "what_content", "who"),
    "wiki_hop_original": ("choose_best_object_affirmative_1", "choose_best_object_affirmative_2",
                          "choose_best_object_affirmative_3", "choose_best_object_interrogative_1",
                          "choose_best_object_interrogative_2", "explain_relation", "generate_object",
                          "generate_subject", "generate_subject_and_object"),
    "wiki_qa": ("Decide_good_answer", "Direct_Answer_to_Question", "Generate_Question_from_Topic", "Is_This_True_",
                "Jeopardy_style", "Topic_Prediction_Answer_Only", "Topic_Prediction_Question_Only",
                "Topic_Prediction_Question_and_Answer_Pair", "automatic_system", "exercise", "found_on_google"),
    "wiqa": ("does_the_supposed_perturbation_have_an_effect", "effect_with_label_answer",
             "effect_with_string_answer", "what_is_the_final_step_of_the_following_process",
             "what_is_the_missing_first_step", "what_might_be_the_first_step_of_the_process",
             "what_might_be_the_last_step_of_the_process", "which_of_the_following_is_the_supposed_perturbation"),
    "xsum": ("DOC_boils_down_to_simple_idea_that", "DOC_given_above_write_one_sentence",
             "DOC_how_would_you_rephrase_few_words", "DOC_tldr", "DOC_write_summary_of_above", "article_DOC_summary",
             "college_roommate_asked_DOC_so_I_recap", "read_below_DOC_write_abstract", "summarize_DOC",
             "summarize_this_DOC_summary"),
    "yelp_review_full": ("based_on_that", "format_rating", "format_score", "format_star", "on_a_scale",
                         "so_i_would", "this_place"),
}

# Published as zero-byte files: registered (so the catalog matches the folder) but left out of
# every mixture, and reported by `flan_jax_tasks.t0.check_files`. (All 18 TREC files are unusable in this
# subset: these 11 are empty and the other 7 have empty completions, see below.)
EMPTY_FILES: frozenset[str] = frozenset(
    f"trec_fine_grained_{kind}{suffix}"
    for kind, suffix in [("ABBR", ""), ("ABBR", "_context_first"), ("DESC", ""), ("DESC", "_context_first"),
                         ("ENTY", ""), ("HUM", ""), ("HUM", "_context_first"), ("LOC", ""),
                         ("LOC", "_context_first"), ("NUM", ""), ("NUM", "_context_first")]
)

# Non-empty files whose completions are all empty (only the end marker): registered, their
# records dropped (counted and logged) by the tasks, and left out of every mixture.
EMPTY_COMPLETION_FILES: frozenset[str] = frozenset(
    f"trec_{template}" for template in ("fine_grained_open", "fine_grained_open_context_first",
                                        "pick_the_best_descriptor", "trec1", "trec2",
                                        "what_category_best_describe", "which_category_best_describes")
)
UNUSABLE_FILES = EMPTY_FILES | EMPTY_COMPLETION_FILES

CLUSTER_OF_DATASET: dict[str, str] = {ds: cluster for cluster, datasets in CLUSTERS.items() for ds in datasets}


def file_stems() -> list[str]:
    """All `<dataset>_<template>` file stems of the catalog, sorted like the folder listing."""
    return sorted(f"{dataset}_{template}" for dataset, templates in TEMPLATES.items() for template in templates)
