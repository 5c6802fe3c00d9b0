"""steer's bundled data (calibration text) and corpus readers for SAE training (`steer.data.corpus`)."""
