"""Files on disk, below the runtimes: the checked GGUF header reader and the VocabTrim map."""
