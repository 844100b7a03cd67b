"""moecc profiling."""
