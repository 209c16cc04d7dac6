"""The driver side of `distlm train`: checks before launch, the Ray Train attempts and their supervision
(supervisor), the progress bar and the summary. Nothing here runs inside a training worker."""
