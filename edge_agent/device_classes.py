"""Home Assistant's device classes per entity component: data, taken from Home Assistant 2024.3.3
(`homeassistant/components/binary_sensor/__init__.py` `BinarySensorDeviceClass`,
`homeassistant/components/sensor/const.py` `SensorDeviceClass`, `DEVICE_CLASS_UNITS`,
`DEVICE_CLASS_STATE_CLASSES`).

Home Assistant refuses an MQTT entity whose `device_class` its component does not know, and logs that on
its side only; the config checks each question's class against these tables (`questions.Component`).
Classes added by later releases are not listed: a release before them would refuse the entity.
"""

from __future__ import annotations

BINARY_SENSOR = frozenset(
    """
    battery battery_charging carbon_monoxide cold connectivity door garage_door gas heat light lock moisture
    motion moving occupancy opening plug power presence problem running safety smoke sound tamper update vibration
    window
    """.split()
)

SENSOR = frozenset(
    """
    apparent_power aqi atmospheric_pressure battery carbon_dioxide carbon_monoxide current data_rate data_size
    date distance duration energy energy_storage enum frequency gas humidity illuminance irradiance moisture
    monetary nitrogen_dioxide nitrogen_monoxide nitrous_oxide ozone ph pm1 pm10 pm25 power power_factor
    precipitation precipitation_intensity pressure reactive_power signal_strength sound_pressure speed
    sulphur_dioxide temperature timestamp volatile_organic_compounds volatile_organic_compounds_parts voltage
    volume volume_flow_rate volume_storage water weight wind_speed
    """.split()
)

SENSOR_MEASURED_WITHOUT_UNIT = frozenset({"aqi", "ph", "power_factor"})
"""The numeric sensor classes that take a measurement without a unit of measurement. Every other numeric
class needs one of its units (Home Assistant logs a warning for a sensor without it), and `date`,
`timestamp` and `enum` are not numbers."""

BY_COMPONENT = {"binary_sensor": BINARY_SENSOR, "sensor": SENSOR}
"""The device classes Home Assistant knows for each component the agent announces."""
