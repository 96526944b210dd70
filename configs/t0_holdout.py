"""FLAN's leave-one-cluster-out protocol on T0: train on 7 clusters, evaluate on the 8th.

The held-out cluster is the config argument (needs FLAN_JAX_DATA_DIR):

    python -m flan_jax.train --config=configs/t0_holdout.py:sentiment --workdir=/tmp/t0_minus_sentiment

Clusters: multiple_choice_qa, extractive_qa, closed_book_qa, sentiment, topic_classification,
structure_to_text, summarization, paraphrase (`tasks/t0_catalog.py`). Training reads the
mixture `t0_minus_<cluster>`, which contains no task of that cluster; evaluation reads the
validation split of `t0_<cluster>`, tasks the model never saw in any template.

Read held-out scores with the subset in mind (`flan_jax_tasks.t0.check_files()` lists it): the files hold
the first records of label-sorted datasets, so every imdb record is negative, every
rotten_tomatoes record positive and every dbpedia record "Company"; a constant answer scores
well on those tasks.
"""

from flan_jax import default_config
from flan_jax_tasks import t0_catalog


def get_config(held_out_cluster: str | None = None):
    if held_out_cluster not in t0_catalog.CLUSTERS:
        raise ValueError(
            f"configs/t0_holdout.py needs the held-out cluster as its argument, e.g. "
            f"--config=configs/t0_holdout.py:sentiment; got {held_out_cluster!r}; "
            f"clusters: {', '.join(t0_catalog.CLUSTERS)}"
        )
    config = default_config.get_config()

    config.data.train_mixture = f"t0_minus_{held_out_cluster}"
    config.data.seq_len = 1024
    config.data.batch_size = 16
    config.data.tokenizer.path = ""
    config.data.tokenizer.vocab_size = 8000
    config.data.tokenizer.train_examples = 50_000

    config.model.vocab_size = 8000
    config.model.max_positions = 1024

    config.optimizer.warmup_steps = 200

    config.train.num_steps = 3000
    config.train.log_every = 50

    config.checkpoint.every_steps = 1000

    config.eval.mixtures = (f"t0_{held_out_cluster}",)
    config.eval.split = "validation"
    config.eval.at_start = True  # the untrained baseline on the held-out cluster
    config.eval.every_steps = 1000
    config.eval.max_examples_per_task = 20
    config.eval.max_new_tokens = 64
    return config
