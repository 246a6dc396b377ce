"""Text <-> token ids with the openvino-tokenizers graphs exported beside the model."""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino_tokenizers  # noqa: F401  (registers the tokenizer operations with OpenVINO)


class Tokenizer:
    """Runs `openvino_tokenizer.xml` / `openvino_detokenizer.xml` on the CPU (they are string graphs)."""

    def __init__(self, core: ov.Core, tokenizer_xml, detokenizer_xml):
        self._encoder = core.compile_model(tokenizer_xml, "CPU")
        self._decoder = core.compile_model(detokenizer_xml, "CPU")

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` as the model's Hugging Face tokenizer gives them (special tokens included)."""
        return self._encoder([text])["input_ids"][0].astype(np.int64)

    def decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        return str(self._decoder(np.asarray([token_ids], dtype=np.int64))[0][0])
