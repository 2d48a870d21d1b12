"""Adding LoRAs by reference: Hugging Face files, CivitAI model versions, plain URLs.

A download streams into a temporary file in ``<cache>/loras`` (size-limited and hashed while
it streams, resumed with ``Range`` after a dropped connection where the server allows), then
enters the same ingest path as an upload (``service.ingest``: validate, dedupe, place, row).
``manager.DownloadManager`` runs them as asyncio tasks and reports progress over Socket.IO.
"""
