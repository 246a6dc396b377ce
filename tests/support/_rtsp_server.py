"""A live RTSP camera on loopback for tests: GStreamer's RTSP server streaming a moving test pattern (or, with
`--image`, a still picture) as H.264.

Run with Debian's `/usr/bin/python3` (it has `gi`; the project's Python does not):
`/usr/bin/python3 tests/support/_rtsp_server.py --port 8554` serves `rtsp://127.0.0.1:8554/camera` and prints
`ready` on stdout once it listens. One shared media serves every client, like a real IP camera.
"""

import argparse
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402 - the versions must be chosen first

SOURCES = {
    "ball": "videotestsrc is-live=true pattern=ball",
    "image": "filesrc location={image} ! decodebin ! videoconvert ! imagefreeze is-live=true",
}
PIPELINE = (
    "( {source} ! videoscale ! video/x-raw,format=I420,width={width},height={height},framerate={fps}/1 "
    "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} "
    "! rtph264pay name=pay0 pt=96 config-interval=1 )"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--fps", type=int, default=10, help="frames per second")
    parser.add_argument("--width", type=int, default=160, help="frame width in pixels")
    parser.add_argument("--height", type=int, default=120, help="frame height in pixels")
    parser.add_argument("--image", help="stream this picture (PNG or JPEG) instead of the moving ball")
    args = parser.parse_args()
    source = SOURCES["image"].format(image=args.image) if args.image else SOURCES["ball"]

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(PIPELINE.format(source=source, width=args.width, height=args.height, fps=args.fps))
    factory.set_shared(True)
    server.get_mount_points().add_factory("/camera", factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{args.port}")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
