"""What the packages and commands above import; nothing here imports them (nor datasets/).

- ``cli``: every command's parser, flag types and one error boundary (exit codes);
- ``io``: crash-safe file writes and hashes;
- ``runfolder``: a training run's folder (lock, commits, resume plan, its own files);
- ``misc``: distributed set-up, seeding, logging; ``precision``: mixed precision;
- ``optim``, ``lr_sched``, ``presets``: the optimiser, its schedule, the paper's recipes;
- ``metrics``, ``stats``: AUROC / AUPRC, bootstrap intervals and DeLong;
- ``reports``, ``heatmap``, ``summarize``, ``compare``: tables, plots, Grad-CAM, run summaries.
"""
