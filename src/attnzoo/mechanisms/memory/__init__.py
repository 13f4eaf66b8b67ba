"""Long-context and memory mechanisms: sinks, landmarks, neural memory, context selection."""
