"""Host-side preparation of images and videos for Qwen2.5-VL: resizing and patching, 3D rotary positions of a
prompt, and the plans (windows, frames, buckets) the vision tower runs on."""
