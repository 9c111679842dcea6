"""Model files from single-maintainer wheels: the installed ones must be the reviewed ones."""

from __future__ import annotations

import pytest

from callboard.plugins.local import models


@pytest.mark.parametrize("pinned", models.PINNED_FILES, ids=lambda p: p.package)
def test_installed_model_files_match_their_pinned_sha256(pinned: models.PinnedFile) -> None:
    models.verify(pinned)


def test_a_changed_model_file_is_refused(tmp_path: pytest.TempPathFactory) -> None:
    tampered = models.PinnedFile(
        models.WHISPER_MODEL.package, "model/config.json", models.WHISPER_MODEL.sha256
    )
    with pytest.raises(models.ModelHashMismatch, match="reinstall the pinned version"):
        models.verify(tampered)
