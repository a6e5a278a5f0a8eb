"""Helpers for the tooling around the product (tests, reliability runs, benchmarks, the demo and the scripts):
never imported by model_owner_server/, data_owner_client/ or shared/, and not part of the installed package."""
