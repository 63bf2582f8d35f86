"""Plumbing every chapter leans on, none of it GPT-specific: atomic file writes (``atomic``), file locks
(``locks``), data manifests (``manifest``), one SHA-256 over named tensors (``tensor_hash``), verified and
resumable downloads (``download``), peak-memory measurement (``memory``), ``torchrun`` processes
(``distributed``), resumable training checkpoints (``checkpoint``) and the allowed ranges of numeric
settings, shared by the command line and the settings dataclasses (``ranges``). Nothing here imports a chapter.
"""
