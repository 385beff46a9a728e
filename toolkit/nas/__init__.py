"""Architecture search (issue 17): a space of networks built from block pools of pretrained
backbones (``space``), searched by an LSTM controller trained by policy gradient with a reward
of accuracy and size; the chosen network is saved (``toolkit.models.saved``) and then planned,
exported and trained federated like any zoo model."""
