"""``nnUNetv2_desam_crossdomain``: DeSAM's cross-domain experiment in one command, on nnU-Net's own tools.

The paper's protocol (Sec. 4.1): split one source domain 9:1 into training and in-domain validation,
keep the best model on the in-domain validation split, and test it on every case of every other
(target) domain. Each step is a subprocess of the real console command, so what runs is exactly what
a user would type by hand:

1. ``nnUNetv2_plan_and_preprocess -d SOURCE -c 2d`` and the 9:1 split (:func:`~nnunetv2_desam.experiments.splits.write_source_split`)
2. ``nnUNetv2_train SOURCE 2d 0 -tr TRAINER`` for every row (``--c`` resumes an interrupted one)
3. ``nnUNetv2_predict -chk checkpoint_best.pth`` on every target's ``imagesTr``, and on the source's
   held-out validation cases (the in-domain column: how much of the Dice the domain shift costs)
4. ``nnUNetv2_evaluate_folder`` against the ``labelsTr`` (or the paper's foreground-slice Dice)
5. the Table 2-style report, Fig. 3 (Dice vs. grid size) and Fig. 4 (overlays)

Modules: :mod:`.cli` (command line, entry point), :mod:`.methods` (the table's rows and their trainer
classes), :mod:`.datasets` (raw datasets and their checks), :mod:`.experiment` (the validated settings),
:mod:`.predictions` (which prediction folders, their scores), :mod:`.steps` (the step graph),
:mod:`.subprocess_runner` (one logged nnU-Net command), :mod:`.report_notes` (table and notes),
:mod:`.figures` (Fig. 3 and 4).
"""
