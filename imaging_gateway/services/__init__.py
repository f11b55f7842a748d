"""Use cases (search, retrieve, store); each returns patient data through security's gate."""
