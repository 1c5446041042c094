# Registry (pip) ROS wheels export the include paths of the interpreter they were built with. With
# PIXEL_SAIL_FIX_PY_INCLUDES (set by the Makefile), point the imported Python type-support targets of this
# directory at this build's interpreter; a no-op on distro installs. Include after find_package(<msgs>).
if(PIXEL_SAIL_FIX_PY_INCLUDES)
  find_package(Python3 REQUIRED COMPONENTS Interpreter Development.Module NumPy)
  get_property(_imported DIRECTORY PROPERTY IMPORTED_TARGETS)
  foreach(_t IN LISTS _imported)
    if(_t MATCHES "__rosidl_generator_py$")
      set_target_properties(${_t} PROPERTIES
        INTERFACE_INCLUDE_DIRECTORIES "${Python3_INCLUDE_DIRS};${Python3_NumPy_INCLUDE_DIRS}")
    endif()
  endforeach()
endif()
