"""The classification task (model.task seq_cls), in one place: its rows (`rows`: text/label files,
class names and ids), its head (`head`: config and seeded start) and its evaluation (`evaluation`:
accuracy and Matthews correlation). The causal-LM path reaches it through pipeline.model_task
(which model class) and imports these modules where a run is a classifier's.

Kept empty: importing a submodule runs this file first, and the data loader imports `rows`.
"""
