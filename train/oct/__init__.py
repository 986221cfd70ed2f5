"""The retinal OCT classifier: a frozen InceptionV3 (`models`), its bottleneck
feature store (`store`), the head trained on it (`fit`), synthetic scans
(`synth`), prediction and Grad-CAM; `facts` holds the labels, referral levels
and synthetic-data marker without importing Keras."""
