"""Model cards (Jinja templates in ``diffusers_stages/model_cards/``) and Hub upload."""

from __future__ import annotations

from pathlib import Path

TEMPLATES = Path(__file__).parent / "model_cards"


def render_model_card(template: str, tags: list[str], base_model: str | None = None, **fields):
    """A `huggingface_hub.ModelCard` from ``model_cards/<template>`` with YAML metadata (license, tags, base model)."""
    from huggingface_hub import ModelCard, ModelCardData

    path = TEMPLATES / template
    if not path.is_file():
        raise ValueError(
            f"no model-card template {template!r}; available: {sorted(p.name for p in TEMPLATES.glob('*.md'))}."
        )
    data = ModelCardData(license="apache-2.0", library_name="diffusers", tags=tags, base_model=base_model)
    return ModelCard.from_template(data, template_path=str(path), base_model=base_model, **fields)


def push_folder_to_hub(
    folder,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    ignore_patterns: list[str] | None = None,
    endpoint: str | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` (model card included); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        ignore_patterns=ignore_patterns,
        commit_message="Upload with diffusers-stages",
    )
    return str(info)
