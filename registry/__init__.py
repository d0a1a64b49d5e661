"""The local store of task experts and its Hugging Face Hub sync (coming with the registry issue)."""
