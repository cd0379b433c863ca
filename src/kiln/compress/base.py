"""What every compression stage config shares: module selection and capability flags."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field


class StageConfig(BaseModel):
    """Base of every `compress:` entry. `targets`/`ignore` are shell-style globs over module names
    (e.g. `model.layers.*.mlp.*`), matched against the linear layers inside decoder layers and
    resolved to concrete names once, at plan time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: list[str] = Field(default_factory=lambda: ["*"])
    ignore: list[str] = Field(default_factory=list)

    needs_calibration: ClassVar[bool] = False
    quantizes: ClassVar[bool] = False
