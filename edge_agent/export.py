"""Convert a Hugging Face LLaVA checkpoint into the OpenVINO model directory the engine loads."""

from __future__ import annotations

import pathlib

from edge_agent.errors import UserError


def prepare_output_dir(out_dir, overwrite: bool) -> pathlib.Path:
    """Create `out_dir`; refuse a non-empty one unless `overwrite` (then its files are replaced)."""
    out = pathlib.Path(out_dir)
    if out.is_file():
        raise UserError(f"{out}: output path is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: output directory is not empty; choose another or allow overwriting (--force)")
    out.mkdir(parents=True, exist_ok=True)
    return out
