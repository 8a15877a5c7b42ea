"""Shared-prompt ("DualKV") attention for packed GRPO groups (not built yet: see the
open issue "Shared-prompt training")."""
