"""Examples apart from the service: a VSS-aware application and the end-to-end demo."""
