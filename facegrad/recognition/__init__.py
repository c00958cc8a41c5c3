"""Face recognition with a pretrained network: reading dlib's models, the network, detection
and alignment."""
