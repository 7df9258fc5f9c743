"""Captions: the few ways the tiny world describes a scene.

Some phrasings name every attribute ("a small red circle on the left, blue background"), others only
a few ("a red circle", "a star on a green background", "a star"): a text-to-image model then learns
each word on its own, and "a star" is the plain class prompt DreamBooth's prior preservation uses.
Each template is a str.format string over the scene's attribute names plus `where` (the position
as a phrase); "a" becomes "an" before a vowel afterwards ("an orange star").
"""
from __future__ import annotations

import re

from world.scene import Scene

# How each grid position reads in a sentence.
WHERE: dict[str, str] = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the middle", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}

TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} {where}, {background} background",
    "a {colour} {shape} on a {background} background",
    "a {size} {colour} {shape}",
    "a {colour} {shape} {where}",
    "a {colour} {shape}",
    "a {shape} on a {background} background",
    "a {size} {shape} {where}",
    "a {shape}",
)


def caption(scene: Scene, template: int) -> str:
    """The scene described with TEMPLATES[template]."""
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"caption template={template}: choose 0..{len(TEMPLATES) - 1}")
    text = TEMPLATES[template].format(**scene.attributes(), where=WHERE[scene.position])
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def all_captions(scene: Scene) -> list[str]:
    """Every phrasing of the scene, in TEMPLATES order."""
    return [caption(scene, k) for k in range(len(TEMPLATES))]
