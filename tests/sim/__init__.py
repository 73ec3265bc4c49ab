"""Simulator tests (a package, so its conftest does not shadow other folders')."""
