"""corelens: TransformerLens for multimodal LLMs.

Load an MLLM with every TransformerLens hook (``HookedMLLM``), prepare grounded inputs with the
position of every vision token (``MultimodalBatch``, ``VisionLayout``), and run it through an
attention backend that stays memory-efficient unless you hook the attention pattern.
"""

from corelens import accel, attribution, patching, ram, views
from corelens.ablation import AblationCurve, ablate, ablation_curve, text_to_image_knockout
from corelens.attention import AttentionBackend, AttentionInputs
from corelens.batch import MultimodalBatch
from corelens.errors import CorelensError, InputError, LayoutError, UnknownFamilyError
from corelens.evaluate import EvalResult, evaluate
from corelens.examples import Evidence, GroundedExample, Video
from corelens.families import FAMILIES, family_for_config, get_family
from corelens.head_scores import HeadScores
from corelens.layout import ImageLayout, TokenInfo, ViewGeometry, VisionLayout
from corelens.loaders import load_jsonl, load_refcoco, save_jsonl
from corelens.model import HookedMLLM

__version__ = "0.1.0"

__all__ = [
    "AblationCurve",
    "HeadScores",
    "ablate",
    "ablation_curve",
    "accel",
    "attribution",
    "patching",
    "ram",
    "text_to_image_knockout",
    "views",
    "AttentionBackend",
    "EvalResult",
    "Evidence",
    "Video",
    "evaluate",
    "AttentionInputs",
    "CorelensError",
    "FAMILIES",
    "GroundedExample",
    "HookedMLLM",
    "ImageLayout",
    "InputError",
    "LayoutError",
    "MultimodalBatch",
    "TokenInfo",
    "UnknownFamilyError",
    "ViewGeometry",
    "VisionLayout",
    "family_for_config",
    "get_family",
    "load_jsonl",
    "load_refcoco",
    "save_jsonl",
]
