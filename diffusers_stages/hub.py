"""Model cards (the Jinja templates of the repository's top-level ``model_cards/`` folder) and Hub upload."""

from __future__ import annotations

import os
from fnmatch import fnmatch
from pathlib import Path
from typing import Union

from huggingface_hub import HfApi, ModelCard, ModelCardData

REQUIRED_FILES = ("model_index.json", "README.md")


def model_cards_dir() -> Path:
    """
    The folder of the model card templates: ``diffusers_stages/model_cards/`` in an installed wheel (the top-level
    ``model_cards/`` folder is shipped there by the ``package-dir`` mapping in ``pyproject.toml``), else the
    repository's ``model_cards/`` beside the package (a source checkout or an editable install).
    """
    package = Path(__file__).resolve().parent
    for folder in (package / "model_cards", package.parent / "model_cards"):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"No model card templates in {package / 'model_cards'} or {package.parent / 'model_cards'}."
    )


def render_model_card(
    template: Union[str, os.PathLike] = "deme_merged.md",
    base_model: str | None = None,
    tags: list[str] | None = None,
    license: str | None = None,
    pipeline_tag: str | None = None,
    **fields,
) -> ModelCard:
    r"""
    Render a model card from a Jinja template (a file in ``model_cards/`` by name, or any path) with
    `huggingface_hub.ModelCard.from_template`; the YAML metadata carries ``library_name: diffusers``, the base model
    and the tags.

    Args:
        template (`str` or `os.PathLike`, defaults to ``"deme_merged.md"``): Template file name or path.
        base_model (`str`, *optional*): The pretrained model the adapters were trained on.
        tags (`list[str]`, *optional*): Hub tags (``diffusers`` and ``diffusers-stages`` are always added).
        license (`str`, *optional*): The license identifier.
        pipeline_tag (`str`, *optional*): E.g. ``"text-to-image"`` or ``"unconditional-image-generation"``.
        **fields: Template variables (stages, merge weights, training settings, metrics, ...).
    """
    path = Path(template)
    if not path.is_file():
        path = model_cards_dir() / template
    if not path.is_file():
        raise ValueError(
            f"`template` must be a file or one of {sorted(p.name for p in model_cards_dir().glob('*.md'))}."
        )
    all_tags = list(dict.fromkeys(["diffusers", "diffusers-stages", *(tags or [])]))
    data = ModelCardData(
        library_name="diffusers", base_model=base_model, tags=all_tags, license=license, pipeline_tag=pipeline_tag
    )
    return ModelCard.from_template(data, template_path=str(path), base_model=base_model, **fields)


def check_upload_folder(folder: Union[str, os.PathLike], ignore_patterns: list[str] | None = None) -> list[str]:
    """
    Check that ``folder`` is a complete diffusers pipeline folder for the Hub (``model_index.json``, a ``README.md``
    model card with YAML metadata, safetensors weights for every component with weights, no pickles); return its
    files (relative paths) or raise a `ValueError` naming what is missing.
    """
    root = Path(folder)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    files = [f for f in files if not any(fnmatch(f, pat) for pat in ignore_patterns or [])]
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        raise ValueError(f"Upload folder {root} is missing {missing}.")
    if not (root / "README.md").read_text().startswith("---"):
        raise ValueError(f"{root}/README.md has no YAML metadata header.")
    pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    if pickles:
        raise ValueError(f"Upload folder {root} holds pickled weights {pickles}; save with safetensors.")
    for sub in sorted({f.split("/")[0] for f in files if "/" in f}):
        if (root / sub / "config.json").is_file() and not any(
            f.startswith(f"{sub}/") and f.endswith(".safetensors") for f in files
        ):
            raise ValueError(f"Component `{sub}` of {root} has a config but no safetensors weights.")
    return files


def push_to_hub(
    folder: Union[str, os.PathLike],
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload with diffusers-stages",
    endpoint: str | None = None,
    ignore_patterns: list[str] | None = None,
) -> str:
    r"""
    Check ``folder`` (`check_upload_folder`), create the model repo if needed and upload the folder in one commit.
    Returns the commit URL.

    Args:
        folder (`str` or `os.PathLike`): The merged pipeline folder with its model card.
        repo_id (`str`): ``"user/name"`` on the Hub.
        token (`str`, *optional*): A write token (defaults to the logged-in one).
        private (`bool`, defaults to `False`): Create the repo private.
        commit_message (`str`): The commit message.
        endpoint (`str`, *optional*): Another Hub endpoint (e.g. a local test server).
        ignore_patterns (`list[str]`, *optional*): Files not to upload (e.g. ``["checkpoint-*/**", "logs/**"]``).
    """
    check_upload_folder(folder, ignore_patterns)
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        repo_id=repo_id, folder_path=os.fspath(folder), commit_message=commit_message, ignore_patterns=ignore_patterns
    )
    return str(info.commit_url)
