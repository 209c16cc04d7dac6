"""Hugging Face, both ways: export a checkpoint as a transformers directory (export, checked by verify),
import one to continue pretraining (importer), and sample from one (generate)."""
