"""rig/: the machine's facts and what they allow. Pure: facts in, plan out."""
