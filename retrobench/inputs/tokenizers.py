"""A byte-level tokenizer for models built from a config (``model=tiny_random`` and friends).

Random-weight models have no tokenizer files, so they pair with this nanochat-style tokenizer:
the 256 byte values are the first 256 ids, followed by a few special tokens. It speaks the small
subset of the Hugging Face tokenizer interface the harness uses (``encode``, ``decode``,
``__call__``, the special-token attributes), so tasks and the engine treat it like any other.
"""

from __future__ import annotations

from typing import Any

import torch

#: Special tokens in id order after the 256 byte ids.
SPECIALS: tuple[str, ...] = ("<bos>", "<eos>", "<pad>", "<unk>")


class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are UTF-8 bytes; 256.. are :data:`SPECIALS`.

    Attributes
    ----------
    bos_token_id, eos_token_id, pad_token_id: 256, 257, 258.
    vocab_size: 260 (256 bytes + 4 specials); a model paired with it needs at least this many ids.
    chat_template: always None (there is no chat format).
    """

    chat_template = None
    name_or_path = "byte"

    def __init__(self) -> None:
        self.special_ids = {tok: 256 + i for i, tok in enumerate(SPECIALS)}
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = SPECIALS
        self.bos_token_id = self.special_ids["<bos>"]
        self.eos_token_id = self.special_ids["<eos>"]
        self.pad_token_id = self.special_ids["<pad>"]
        self.unk_token_id = self.special_ids["<unk>"]
        self.vocab_size = 256 + len(SPECIALS)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"

    @property
    def all_special_ids(self) -> list[int]:
        return list(self.special_ids.values())

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """UTF-8 bytes of ``text`` as ids, with ``<bos>`` first when ``add_special_tokens``.

        Returns
        -------
        list[int] of length ``len(text.encode()) + add_special_tokens``.
        """
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (list or 1-D tensor); invalid UTF-8 becomes U+FFFD.

        Special ids are dropped when ``skip_special_tokens``, else written as their names.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        elif isinstance(ids, int):
            ids = [ids]
        names = {v: k for k, v in self.special_ids.items()}
        parts: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special_tokens:
                parts.append(names.get(i, "<unk>"))
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def batch_decode(self, batch: Any, skip_special_tokens: bool = True) -> list[str]:
        """``decode`` of every row of ``batch`` (``[B, N]`` tensor or list of lists)."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in batch]

    def __call__(
        self, text: str | list[str], return_tensors: str | None = None, add_special_tokens: bool = True
    ) -> dict[str, Any]:
        """Encode like a Hugging Face tokenizer.

        Returns
        -------
        ``{"input_ids": ..., "attention_mask": ...}``: lists (a list of lists for a list of texts),
        or ``[B, N]`` LongTensors when ``return_tensors="pt"`` (a batch of texts must then share a
        length; there is no padding).
        """
        single = isinstance(text, str)
        rows = [self.encode(t, add_special_tokens) for t in ([text] if single else text)]
        if return_tensors is None:
            ids = rows[0] if single else rows
            mask = [1] * len(rows[0]) if single else [[1] * len(r) for r in rows]
            return {"input_ids": ids, "attention_mask": mask}
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        if len({len(r) for r in rows}) > 1:
            raise ValueError("ByteTokenizer does not pad: texts in a batch must have the same byte length")
        ids_t = torch.tensor(rows, dtype=torch.long)
        return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t)}
