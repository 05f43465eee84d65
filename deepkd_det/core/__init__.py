"""Every formula and every mechanism both tasks share, once: losses (``losses``, ``mlkd``, ``crld``,
``reviewkd``, ``diffkd``, ``dense_kd`` for sigmoid heads), the top-k schedule (``topk``), the decoupled optimizers (``optim``) and
step (``step``), GSNR (``gsnr``), the frozen teacher (``teacher``), GPD (``gpd``), mixed precision
(``amp``), the DEEPKD settings (``settings``), distributed helpers (``dist``), files (``io``).

Pure torch: nothing here imports detectron2, so classification works without it. Import from the
module that holds a name (``from deepkd_det.core.losses import kd_parts``); this package re-exports
nothing, so importing one module does not load the others.
"""
