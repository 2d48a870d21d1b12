"""Models from the Hugging Face Hub: recommendations, search, details and downloads
(CONTRACT §3.3 and §3.4)."""
