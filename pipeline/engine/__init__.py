"""The engine: images -> scores -> optimized images, for one loaded model on one explicit device."""
