"""Host-side preparation of images and videos for Qwen2.5-VL: resizing and patching, 3D rotary positions of a
prompt, and their features through the vision tower."""
