"""The LoRA engine: everything about applying LoRA files to a loaded pipeline.

Generation uses one entry point, ``PipelineManager.apply_loras(requests)`` (a context manager
backed by :class:`LoRAEngine`), with :class:`LoRARequest` describing each LoRA, and catches
one error, :class:`LoRAIncompatibleError`. Inside (the files themselves are read with
``app.cores.lora_files.key_grammar``): where each layer lands in each model family (``key_mapping``,
``original_names``), the layer maths of every network type (``layer_math``), the size check
(``preparation``), fusion and exact restore (``fusion``) and the per-model cache (``cache``).
"""

from app.cores.lora_engine.cache import LoRACache
from app.cores.lora_engine.engine import LoRAEngine
from app.cores.lora_engine.errors import LoRAIncompatibleError
from app.cores.lora_engine.request import LoRARequest

__all__ = ["LoRACache", "LoRAEngine", "LoRAIncompatibleError", "LoRARequest"]
