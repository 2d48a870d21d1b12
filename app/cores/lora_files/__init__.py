"""What a LoRA file is, read from the file alone: the one place that understands LoRA files.

The bounded safetensors header reader (``safetensors_file``, also used for model
checkpoints), the key grammar of every trainer's format (``key_grammar``, into the
``layers`` types the LoRA engine applies), the naming conventions and refusals of the upload
check (``key_names``, ``inspection``, ``inspection_types``), the family a LoRA was made for
(``base_model``), its facts for the UI (``metadata``) and its hashes (``hashes``). HTTP,
storage and database stay in ``app.features.loras``; applying LoRAs is
``app.cores.lora_engine``.
"""
