"""imaging-gateway: a province's DICOM study index, DICOMweb service and federation node."""

__version__ = "0.1.0"
