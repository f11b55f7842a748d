"""Pure functions on DICOM bytes: headers -> records, synthetic studies. No I/O."""
