"""A local Hugging Face text encoder (a folder with the model and its tokenizer, written by
`save_pretrained`; never a download) for caption embeddings in `scm_fast.prepare --text-encoder`.

The model class is the one its config.json names (`architectures`: CLIPTextModel,
CLIPTextModelWithProjection, T5EncoderModel, ...); a pipeline folder's text_encoder/ and tokenizer/
are used when given the pipeline. Per caption it gives encoder_hidden_states (L, D) (the last hidden
state), encoder_attention_mask (L,) (1 = token) and, where the model pools, pooled_projections (D',).
"""
import json
from pathlib import Path

import torch


def _folders(path):
    path = Path(path)
    if (path / "text_encoder" / "config.json").is_file():
        return path / "text_encoder", path / "tokenizer"
    if not (path / "config.json").is_file():
        raise ValueError(f"--text-encoder {path}: not a transformers model folder (no config.json; write one "
                         f"with save_pretrained, or pass a pipeline folder with text_encoder/)")
    return path, path


class TextEncoder:
    """encode(list of captions) -> {key: tensor (b, ...)} (module docstring)."""

    def __init__(self, path, device="cpu", max_length=None):
        try:
            import transformers  # noqa: PLC0415 - optional: only for caption embeddings
        except ImportError:
            raise ValueError("--text-encoder needs the transformers package (pip install transformers), or pass "
                             "precomputed embeddings with --cond / --cond-per-class") from None
        model_dir, tok_dir = _folders(path)
        arch = (json.loads((model_dir / "config.json").read_text()).get("architectures") or [None])[0]
        cls = getattr(transformers, arch or "", None)
        if cls is None:
            raise ValueError(f"--text-encoder {path}: config.json names no transformers model class "
                             f"(architectures: {arch!r})")
        self.model = cls.from_pretrained(model_dir, local_files_only=True).to(device).eval().requires_grad_(False)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        self.max_length = int(max_length or min(self.tokenizer.model_max_length, 512))
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, captions):
        tok = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        out = self.model(input_ids=tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device))
        result = {"encoder_hidden_states": out.last_hidden_state.float().cpu(),
                  "encoder_attention_mask": tok.attention_mask.to(torch.uint8)}
        pooled = getattr(out, "text_embeds", None)
        pooled = getattr(out, "pooler_output", None) if pooled is None else pooled
        if pooled is not None:
            result["pooled_projections"] = pooled.float().cpu()
        return result
