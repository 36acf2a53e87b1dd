"""Dynamic Linear Attention (arXiv 2606.10650): the reference implementation.

The schedule is data: policies (``dla.schedule``) produce one ``death`` tensor per sequence and
head; every op (``dla.ops``) consumes it.
"""

from dla.ops import DLAState, chunk_dla, naive_dla, recurrent_dla
from dla.schedule import NEVER, NONE, POLICIES, Schedule, SegmentState, novelty_scores, plan_schedule

__version__ = "0.1.0"

__all__ = ["DLAState", "chunk_dla", "NEVER", "NONE", "POLICIES", "Schedule", "SegmentState", "naive_dla",
           "novelty_scores",
           "plan_schedule", "recurrent_dla"]

# Token-mixer layers (torch only) and the Hugging Face models (transformers): `import dla` keeps
# working without transformers, or with a version too old for the models; then only the model
# names fail, saying why. Importing the models registers model_type "dla" with the Auto classes.
from dla.layers import DLAGatedDeltaNet, DLAMamba2, PolicyConfig, count_parameters  # noqa: E402

__all__ += ["DLAGatedDeltaNet", "DLAMamba2", "PolicyConfig", "count_parameters"]
_MODEL_NAMES = ("DLACache", "DLAConfig", "DLAForCausalLM", "DLAModel", "generate")
try:
    from dla.generation import generate  # noqa: E402, F401 (re-exported)
    from dla.models import DLACache, DLAConfig, DLAForCausalLM, DLAModel  # noqa: E402, F401 (re-exported)
    __all__ += list(_MODEL_NAMES)
except ImportError as error:
    _models_error = error

    def __getattr__(name):
        if name in _MODEL_NAMES:
            raise ImportError(f"dla.{name} needs transformers >= 5 ({_models_error})") from _models_error
        raise AttributeError(f"module 'dla' has no attribute {name!r}")
