"""moecc experiments."""
