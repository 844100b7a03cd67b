"""moecc optimizer."""
