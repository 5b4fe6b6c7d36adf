"""Security analyzer: findings about Istio configuration, computed from the policy model."""
