"""Values the desktop UI sends, spelled as in CONTRACT.md §4.3 (kept apart from the app's enums
on purpose: tests check the app against the contract, not against itself)."""

SAMPLER_VALUES = [
    "EULER_A",
    "KDPM2_A",
    "EULER",
    "DDIM",
    "LMS",
    "PNDM",
    "DPM_SOLVER_MULTISTEP",
    "DPM_SOLVER_MULTISTEP_KARRAS",
    "DPM_SOLVER_SINGLESTEP",
    "DPM_SOLVER_SDE",
    "DPM_SOLVER_SDE_KARRAS",
    "DDPMS",
    "UniPC",
    "DEIS",
    "KDPM2",
    "HEUN",
    "LCM",
    "TCD",
]
