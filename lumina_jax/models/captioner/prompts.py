"""UniCap-style captioning instructions: granularity x perspective x language (spec §8).

UniCap (Lumina-Image 2.0 paper §4.3) captions every training image at four granularities (detailed,
medium, short, tag), from several perspectives (style, main object, all objects, attributes, spatial
relations) and in English and Chinese. Its weights and exact prompts are not released; these templates
ask a Qwen2-VL-style instruction model for the same outputs. A fine-tuned captioner may want its own
wording: :func:`instruction` accepts ``custom`` to override the text while the CLI keeps the bookkeeping.
"""

from __future__ import annotations

from typing import Optional

GRANULARITIES = ("detailed", "medium", "short", "tag")
PERSPECTIVES = ("general", "style", "main_object", "all_objects", "attributes", "spatial")
LANGUAGES = ("en", "zh")

_BASE: dict[str, dict[str, str]] = {
    "en": {
        "detailed": ("Describe this image in detail, in one or more fluent paragraphs. Cover the overall scene, "
                     "every visible object with its attributes (color, shape, material, size, count), any text "
                     "in the image, the spatial relations between objects, the background, the lighting and "
                     "the artistic style or medium."),
        "medium": ("Describe this image in a few sentences: the main subject and its key attributes, the "
                   "other important objects, the setting and the style."),
        "short": "Describe this image in one concise sentence.",
        "tag": ("List comma-separated tags for this image: objects, attributes, scene, style and medium. "
                "Output only the tags."),
    },
    "zh": {
        "detailed": ("请用一段或多段流畅的文字详细描述这张图片，包括整体场景、每个可见物体及其属性（颜色、形状、材质、"
                     "大小、数量）、图中的文字、物体之间的空间关系、背景、光照以及艺术风格或媒介。"),
        "medium": "请用几句话描述这张图片：主体及其主要属性、其他重要物体、场景和风格。",
        "short": "请用一句简洁的话描述这张图片。",
        "tag": "请为这张图片列出以逗号分隔的标签：物体、属性、场景、风格和媒介。只输出标签。",
    },
}

_FOCUS: dict[str, dict[str, str]] = {
    "en": {
        "style": "Focus on the visual style: medium, artistic style, color palette, lighting and composition.",
        "main_object": "Focus on the main object: what it is, its appearance, pose or state, and its attributes.",
        "all_objects": "Enumerate all objects in the image, including small and background ones.",
        "attributes": "Focus on attributes: colors, shapes, materials, textures, sizes and counts of the objects.",
        "spatial": ("Focus on spatial relations: where each object is in the frame and relative to the others "
                    "(left, right, above, below, in front of, behind, inside)."),
    },
    "zh": {
        "style": "请重点描述视觉风格：媒介、艺术风格、色调、光照和构图。",
        "main_object": "请重点描述主要物体：它是什么、外观、姿态或状态以及属性。",
        "all_objects": "请列举图中的所有物体，包括小物体和背景中的物体。",
        "attributes": "请重点描述属性：物体的颜色、形状、材质、纹理、大小和数量。",
        "spatial": "请重点描述空间关系：每个物体在画面中的位置以及与其他物体的相对位置（左、右、上、下、前、后、内部）。",
    },
}


def instruction(granularity: str = "detailed", perspective: str = "general", lang: str = "en",
                custom: Optional[str] = None) -> str:
    """The user instruction for one caption request (``custom`` replaces the text when given)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r} not in {GRANULARITIES}")
    if perspective not in PERSPECTIVES:
        raise ValueError(f"perspective {perspective!r} not in {PERSPECTIVES}")
    if lang not in LANGUAGES:
        raise ValueError(f"lang {lang!r} not in {LANGUAGES}")
    if custom:
        return custom
    text = _BASE[lang][granularity]
    if perspective != "general":
        text = f"{text} {_FOCUS[lang][perspective]}" if lang == "en" else text + _FOCUS[lang][perspective]
    return text
