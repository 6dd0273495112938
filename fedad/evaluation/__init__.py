"""Scoring every model alike: metrics, the comparison table, figures, importance and SHAP."""
