"""moecc runtime."""
