"""Grafana dashboards of the serving metrics, installed with the package for provisioning."""
