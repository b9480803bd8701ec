"""ROS 2 node: sensor_msgs/Image in, std_msgs/String (JSON caption) out, newest frame only.

    ros2 run ... or: python examples/ros2_captioner_node.py --ros-args \
        -p model:=/models/llava-v1.5-7b-Q4_K_M.gguf -p mmproj:=/models/llava-v1.5-7b-mmproj-model-f16.gguf \
        -r image:=/camera/image_raw

Thin on purpose: the frame loop (vhr_edge.robot.LatestFrameCaptioner) and the message
conversion (vhr_edge.robot.image_msg_to_array) are the tested parts. Needs rclpy,
sensor_msgs and std_msgs from a ROS 2 installation (not a pip dependency of vhr-edge).
"""

from __future__ import annotations

import json

import rclpy
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import String

from vhr_edge import Session
from vhr_edge.errors import ImageError
from vhr_edge.robot import LatestFrameCaptioner, image_msg_to_array
from vhr_edge.session import GenerationConfig, VhrConfig


class CaptionerNode(Node):
    def __init__(self):
        super().__init__("vhr_edge_captioner")
        model = self.declare_parameter("model", "").value
        mmproj = self.declare_parameter("mmproj", "").value
        alpha = float(self.declare_parameter("alpha", 2.0).value)
        max_tokens = int(self.declare_parameter("max_tokens", 64).value)
        self.pub = self.create_publisher(String, "caption", 10)
        session = Session(model, mmproj)
        self.captioner = LatestFrameCaptioner(
            session, self.publish, vhr=VhrConfig(alpha=alpha), gen=GenerationConfig(n_predict=max_tokens),
            on_error=lambda e, info: self.get_logger().warning(f"frame {info.seq}: {e}"))
        self.create_subscription(Image, "image", self.on_image, qos_profile_sensor_data)

    def on_image(self, msg: Image) -> None:
        try:
            frame = image_msg_to_array(msg.encoding, msg.height, msg.width, msg.step, bytes(msg.data),
                                       bool(msg.is_bigendian))
        except ImageError as e:
            self.get_logger().warning(str(e))
            return
        self.captioner.submit(frame)  # never blocks the executor

    def publish(self, result, info) -> None:
        self.pub.publish(String(data=json.dumps({
            "caption": result.text, "latency_ms": round(info.latency_ms, 1), "dropped": info.dropped,
            "selected_heads": {str(k): v for k, v in result.vhr.selected_heads.items()}})))

    def destroy_node(self):
        self.captioner.close()
        super().destroy_node()


def main():
    rclpy.init()
    node = CaptionerNode()
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
